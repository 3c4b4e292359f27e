"""``python -m ternarize``: the same as the ``ternarize`` command."""

from .cli import main

if __name__ == "__main__":
    main()
