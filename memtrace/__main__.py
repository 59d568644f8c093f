from memtrace.cli import main

main()
