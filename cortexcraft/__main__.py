from cortexcraft.cli import main

raise SystemExit(main())
