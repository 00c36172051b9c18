"""Interactive work leaves background jobs their cores (`tomoe_core.infra.jobs.fair_thread_count`)."""
from tomoe_core.infra.jobs import fair_thread_count


def test_interactive_threads_are_the_cpus_other_work_leaves_free():
    assert fair_thread_count(cpus=2, load=0.1, running_jobs=0) == 2  # alone: every core
    assert fair_thread_count(cpus=2, load=1.2, running_jobs=0) == 1  # a job the load average sees
    assert fair_thread_count(cpus=2, load=0.0, running_jobs=1) == 1  # one it does not see yet
    assert fair_thread_count(cpus=2, load=5.0, running_jobs=3) == 1  # never fewer than one
    assert fair_thread_count(cpus=16, load=3.4, running_jobs=5) == 11
    assert 1 <= fair_thread_count() <= 4096
