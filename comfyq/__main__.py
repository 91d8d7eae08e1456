import sys

from comfyq.cli import main

sys.exit(main())
