import sys

from moeprec.cli import main

sys.exit(main())
