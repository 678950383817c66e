import sys

from traqmilter.cli import main

sys.exit(main())
