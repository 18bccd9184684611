"""`python -m croft.storage`: the storage service."""

from croft.common.service import main as run_service


def main() -> None:
    run_service("storage")


if __name__ == "__main__":
    main()
