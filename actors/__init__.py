"""Ray actors and tasks of the farm (installed as `fact_ray.actors`).

    discovery     DiscoveryAgent (a Ray actor by discovery_actor()): capture + rule discovery in a worker; the
                  `Ranker` seam for the LLM agent
    compile       compile_source (CPU task, retried only on node/worker death) and compile_all (the fan-out)
    trial_worker  TrialWorker (one per GPU, killable, restarted after a crash) and TrialPool (time limits)
    gpu_trial     run_trial: the function a GPU worker runs for one candidate (its family's trial)
    executor      RayExecutor: the realization pipeline's build and trial steps on the cluster
    table_writer  TableWriter: the single writer of the pattern table in a run

Nothing is imported here, so importing one module does not pull in the others.
"""
