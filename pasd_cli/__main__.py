"""`python -m pasd_cli`: the command line, as torchrun starts it (torchrun -m pasd_cli ...)."""

from .cli import main

if __name__ == "__main__":
    main()
