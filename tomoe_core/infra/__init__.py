"""Infrastructure: locations (`cache_dir`, `shipped_dir`), paths a studio user types (`paths`), file
helpers, background jobs, machine facts, ranks and progress bars. Torch-free."""
