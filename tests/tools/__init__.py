"""Set-up helpers shared by the Makefile and the tests: dependency locks, Go-built tools."""
