import sys

from sstoken.cli import main

sys.exit(main())
