from outbox_relay.cli import main

main()
