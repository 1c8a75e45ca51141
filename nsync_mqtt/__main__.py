from nsync_mqtt.cli import main

raise SystemExit(main())
