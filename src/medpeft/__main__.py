from medpeft.cli import main

main()
