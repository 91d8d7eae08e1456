"""``python -m comfyq.sim``: serve a simulated ComfyUI until SIGINT/SIGTERM."""

import sys

from comfyq.sim.server import main

sys.exit(main())
