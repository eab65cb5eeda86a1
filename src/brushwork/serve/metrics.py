"""Prometheus metrics of one server (own registry, so several apps in one process do not clash)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("brushwork_queue_depth", "Jobs waiting in the queue", registry=self.registry)
        self.running_jobs = Gauge("brushwork_running_jobs", "Jobs in the running batch", registry=self.registry)
        self.job_latency = Histogram("brushwork_job_latency_seconds", "Time from submission to finished job",
                                     ["api", "state"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("brushwork_queue_wait_seconds", "Time a job waited before it ran",
                                    buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_images = Histogram("brushwork_batch_images", "Images sampled together in one UNet batch",
                                      buckets=BATCH_BUCKETS, registry=self.registry)
        self.images = Counter("brushwork_images_generated", "Images generated", registry=self.registry)
        self.jobs = Counter("brushwork_jobs_finished", "Finished jobs by final state", ["state"],
                            registry=self.registry)
        self.errors = Counter("brushwork_errors", "Rejected requests and failed jobs by kind", ["kind"],
                              registry=self.registry)

        self.live_frames = Counter("brushwork_live_frames", "Live frames by outcome: rendered, dropped (a later "
                                   "message replaced it), cancelled (its connection closed), failed", ["outcome"],
                                   registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
