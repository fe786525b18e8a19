"""``python -m requant.cli``: the library's command line without orchestration (``convert`` needs ``--local``)."""

import sys

from requant.cli import main

sys.exit(main())
