"""`python -m metamlip` runs the command line (also under torchrun)."""

from metamlip.cli.main import main

raise SystemExit(main())
