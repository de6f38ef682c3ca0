from turbo_cli.app import main

main()
