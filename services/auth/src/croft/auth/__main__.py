"""`python -m croft.auth`: the auth service."""

from croft.common.service import main as run_service


def main() -> None:
    run_service("auth")


if __name__ == "__main__":
    main()
