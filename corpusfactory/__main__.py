from corpusfactory.cli import main

raise SystemExit(main())
