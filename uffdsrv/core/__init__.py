"""The pure core: decisions over plain arrays and events. No syscalls here,
so all of it is tested without root."""
