from redlb.cli import main

main()
