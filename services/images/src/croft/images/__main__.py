"""`python -m croft.images`: the images service."""

from croft.common.service import main as run_service


def main() -> None:
    run_service("images")


if __name__ == "__main__":
    main()
