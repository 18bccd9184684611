"""`python -m croft.network`: the network service."""

from croft.common.service import main as run_service


def main() -> None:
    run_service("network")


if __name__ == "__main__":
    main()
