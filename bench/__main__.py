"""`python -m invbench ...`: the same as the `invbench` command."""
from .cli import main

if __name__ == "__main__":
    main()
