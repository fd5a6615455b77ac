"""A direct ext4 writer: geometry (layout), records, checksums and the I/O shell (writer)."""
