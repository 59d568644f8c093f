from memtrace.commands.main import main

main()
