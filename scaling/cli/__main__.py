"""`python -m scaling.cli <command>`: how the launcher starts every rank (and tests call it)."""
import sys

from scaling.cli import main

sys.exit(main())
