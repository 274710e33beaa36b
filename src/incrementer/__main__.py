from incrementer.cli import main

main()
