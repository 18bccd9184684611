"""`python -m croft.api`: the api service."""

from croft.common.service import main as run_service


def main() -> None:
    run_service("api")


if __name__ == "__main__":
    main()
