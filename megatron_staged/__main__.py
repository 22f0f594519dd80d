import sys

from megatron_staged.cli import main

if __name__ == "__main__":
    sys.exit(main())
