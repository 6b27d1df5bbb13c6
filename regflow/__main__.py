"""``python -m regflow``: the ``regflow`` command line (for ``torchrun -m regflow train``)."""

from regflow.cli import main

if __name__ == "__main__":
    main()
