"""`python -m croft.compute`: the compute service."""

from croft.common.service import main as run_service


def main() -> None:
    run_service("compute")


if __name__ == "__main__":
    main()
