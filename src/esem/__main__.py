from esem.cli import main

raise SystemExit(main())
