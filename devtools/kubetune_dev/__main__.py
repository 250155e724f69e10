from kubetune_dev.cli import main

main()
