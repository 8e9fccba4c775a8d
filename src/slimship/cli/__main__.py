"""`python -m slimship.cli …`: the same as the `slimship` console script."""

from slimship.cli import main

if __name__ == "__main__":
    main()
