"""``python -m ziplm_ext`` == the ``ziplm`` console script."""

import sys

from ziplm_ext.cli import main

if __name__ == "__main__":
    sys.exit(main())
