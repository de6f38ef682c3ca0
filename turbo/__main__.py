from turbo.cli.app import main

main()
