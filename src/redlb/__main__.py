import sys

try:  # Ctrl-C during the imports ends quietly too
    from redlb.cli import main

    main()
except KeyboardInterrupt:
    sys.exit(130)
