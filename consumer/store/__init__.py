"""Where a device keeps its objects: the store protocol, SQLite + files, and in memory."""
