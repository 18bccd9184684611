"""`croft-node`: the node agent (started by `croft up`)."""

import sys

from croft.common.config import ConfigError, load_config
from croft.common.errors import CroftError


def main() -> None:
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"croft-node: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from croft.node.agent import run

    try:
        run(config)
    except CroftError as exc:
        print(f"croft-node: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
