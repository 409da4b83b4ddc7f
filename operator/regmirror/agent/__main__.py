"""`python -m regmirror.agent`: the agent without the operator's CLI imports."""

import sys

from regmirror.agent import main

sys.exit(main())
