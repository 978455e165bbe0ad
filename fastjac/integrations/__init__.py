"""Optional integrations with third-party libraries (imported on use; fastjac does not depend on them)."""
