from queuectl.cli_root import main

main()
