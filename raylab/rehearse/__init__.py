"""`raylab rehearse`: a real multi-node Ray cluster on one Linux machine, built from `cluster.yaml`'s own start
commands (spec), one head and N-1 worker nodes each in its own network, mount, PID and UTS namespaces (nodes), a job
submitted with `ray job submit --working-dir .` while a worker node is killed mid-training (run), and the cluster's
contract checked on what the job left behind (checks)."""
