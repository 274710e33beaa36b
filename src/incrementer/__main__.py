from incrementer.cli.main import main

main()
