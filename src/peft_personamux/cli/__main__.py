"""``python -m peft_personamux.cli``: the ``personamux`` command."""

import sys

from .main import main

sys.exit(main())
