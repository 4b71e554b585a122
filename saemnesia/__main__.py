from saemnesia.cli import main

main()
