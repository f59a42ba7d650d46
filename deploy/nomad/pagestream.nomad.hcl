# pagestream on Nomad: one group per stage, each with its own count, health
# checks on /readyz, rolling updates with a canary and auto-revert, and
# Nomad Autoscaler policies on the stage's queue lag
# (pagestream_queue_pending, exported by the stage itself; the autoscaler's
# `prometheus` APM plugin must point at a Prometheus scraping /metrics).
#
#   nomad var put nomad/jobs/pagestream \
#     nats_url='nats://u:p@n1:4222,nats://u:p@n2:4222,nats://u:p@n3:4222' \
#     api_tokens='tok1,tok2' s3_access_key_id=… s3_secret_access_key=… \
#     webhook_secret="whsec_$(openssl rand -base64 32)"
#   nomad job run -var image=registry.example/pagestream:1.0 deploy/nomad/pagestream.nomad.hcl
#
# NATS itself (a 3-node JetStream cluster) runs outside this job; with 3
# nodes set replicas = 3. scripts/check-deploy parses this file (python-hcl2)
# and checks its groups, checks, images and setting names against the code.

variable "image" {
  type        = string
  description = "The pagestream image (Dockerfile at the repository root)."
  default     = "pagestream:latest"
}

variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}

variable "replicas" {
  type        = number
  description = "nats.replicas: 3 on a 3-node NATS cluster, 1 on a single server."
  default     = 3
}

variable "s3_bucket" {
  type    = string
  default = "pagestream-results"
}

job "pagestream" {
  datacenters = var.datacenters
  type        = "service"

  # One replica at a time, a canary first; a canary that does not turn
  # healthy (/readyz) within the deadline is reverted.
  update {
    max_parallel      = 1
    canary            = 1
    auto_promote      = true
    auto_revert       = true
    health_check      = "checks"
    min_healthy_time  = "10s"
    healthy_deadline  = "5m"
    progress_deadline = "10m"
  }

  group "ingress" {
    count = 2

    network {
      port "http" {
        to = 8080
      }
    }

    service {
      name     = "pagestream-ingress"
      port     = "http"
      provider = "nomad"

      check {
        type     = "http"
        path     = "/readyz"
        interval = "10s"
        timeout  = "2s"
      }
    }

    restart {
      attempts = 3
      interval = "5m"
      delay    = "15s"
      mode     = "delay"
    }

    task "ingress" {
      driver = "docker"

      config {
        image = var.image
        args  = ["ingress"]
        ports = ["http"]
      }

      # Secrets from Nomad variables, never in the job file.
      template {
        destination = "secrets/pagestream.env"
        env         = true
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/pagestream" }}
          PAGESTREAM_NATS_URL={{ .nats_url }}
          PAGESTREAM_INGRESS_API_TOKENS={{ .api_tokens }}
          PAGESTREAM_NOTIFIER_SECRET={{ .webhook_secret }}
          PAGESTREAM_UPLOADER_S3_ACCESS_KEY_ID={{ .s3_access_key_id }}
          PAGESTREAM_UPLOADER_S3_SECRET_ACCESS_KEY={{ .s3_secret_access_key }}
          {{ end }}
        EOT
      }

      env {
        PAGESTREAM_NATS_REPLICAS   = "${var.replicas}"
        PAGESTREAM_INGRESS_ADDR    = "0.0.0.0:8080"
        PAGESTREAM_UPLOADER_TARGET = "s3"
        PAGESTREAM_UPLOADER_S3_BUCKET = var.s3_bucket
      }

      resources {
        cpu    = 500
        memory = 256
      }
    }
  }

  group "splitter" {
    count = 1

    network {
      port "admin" {
        to = 9101
      }
    }

    service {
      name     = "pagestream-splitter"
      port     = "admin"
      provider = "nomad"

      check {
        type     = "http"
        path     = "/readyz"
        interval = "10s"
        timeout  = "2s"
      }
    }

    restart {
      attempts = 3
      interval = "5m"
      delay    = "15s"
      mode     = "delay"
    }

    scaling {
      enabled = true
      min     = 1
      max     = 8

      policy {
        cooldown            = "2m"
        evaluation_interval = "30s"

        check "docs_lag" {
          source = "prometheus"
          query  = "max(pagestream_queue_pending{stage=\"splitter\"})"

          strategy "target-value" {
            target = 4
          }
        }
      }
    }

    task "splitter" {
      driver = "docker"

      config {
        image = var.image
        args  = ["splitter"]
        ports = ["admin"]
      }

      template {
        destination = "secrets/pagestream.env"
        env         = true
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/pagestream" }}
          PAGESTREAM_NATS_URL={{ .nats_url }}
          {{ end }}
        EOT
      }

      env {
        PAGESTREAM_NATS_REPLICAS       = "${var.replicas}"
        PAGESTREAM_SPLITTER_ADMIN_ADDR = "0.0.0.0:9101"
      }

      # pdfium runs in a render-worker child process, capped at
      # splitter.render_memory_mb (2048) of address space.
      resources {
        cpu    = 1000
        memory = 1024
      }
    }
  }

  group "inferencer" {
    count = 2

    network {
      port "admin" {
        to = 9102
      }
    }

    service {
      name     = "pagestream-inferencer"
      port     = "admin"
      provider = "nomad"

      check {
        type     = "http"
        path     = "/readyz"
        interval = "10s"
        timeout  = "2s"
      }
    }

    restart {
      attempts = 3
      interval = "5m"
      delay    = "15s"
      mode     = "delay"
    }

    scaling {
      enabled = true
      min     = 1
      max     = 16

      policy {
        cooldown            = "2m"
        evaluation_interval = "30s"

        check "pages_lag" {
          source = "prometheus"
          query  = "max(pagestream_queue_pending{stage=\"inferencer\"})"

          strategy "target-value" {
            target = 16
          }
        }
      }
    }

    task "inferencer" {
      driver = "docker"

      config {
        image = var.image
        args  = ["inferencer"]
        ports = ["admin"]
      }

      template {
        destination = "secrets/pagestream.env"
        env         = true
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/pagestream" }}
          PAGESTREAM_NATS_URL={{ .nats_url }}
          {{ end }}
        EOT
      }

      env {
        PAGESTREAM_NATS_REPLICAS         = "${var.replicas}"
        PAGESTREAM_INFERENCER_ADMIN_ADDR = "0.0.0.0:9102"
        PAGESTREAM_INFERENCER_MODEL      = "layout_cdla"
      }

      # The layout model is loaded once per process (~100 MiB resident for
      # layout_cdla); OCR of scanned pages took the inferencer to 1065 MiB
      # (BENCHMARKS.md), hence the same 1280 MiB as docker-compose.yml
      # (docs/deploy.md#memory-limits; 512 with PAGESTREAM_INFERENCER_OCR_MODEL="").
      resources {
        cpu    = 2000
        memory = 1280
      }
    }
  }

  group "uploader" {
    count = 1

    network {
      port "admin" {
        to = 9103
      }
    }

    service {
      name     = "pagestream-uploader"
      port     = "admin"
      provider = "nomad"

      check {
        type     = "http"
        path     = "/readyz"
        interval = "10s"
        timeout  = "2s"
      }
    }

    restart {
      attempts = 3
      interval = "5m"
      delay    = "15s"
      mode     = "delay"
    }

    scaling {
      enabled = true
      min     = 1
      max     = 4

      policy {
        cooldown            = "2m"
        evaluation_interval = "30s"

        check "inferred_lag" {
          source = "prometheus"
          query  = "max(pagestream_queue_pending{stage=\"uploader\"})"

          strategy "target-value" {
            target = 64
          }
        }
      }
    }

    task "uploader" {
      driver = "docker"

      config {
        image = var.image
        args  = ["uploader"]
        ports = ["admin"]
      }

      template {
        destination = "secrets/pagestream.env"
        env         = true
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/pagestream" }}
          PAGESTREAM_NATS_URL={{ .nats_url }}
          PAGESTREAM_UPLOADER_S3_ACCESS_KEY_ID={{ .s3_access_key_id }}
          PAGESTREAM_UPLOADER_S3_SECRET_ACCESS_KEY={{ .s3_secret_access_key }}
          {{ end }}
        EOT
      }

      env {
        PAGESTREAM_NATS_REPLICAS       = "${var.replicas}"
        PAGESTREAM_UPLOADER_ADMIN_ADDR = "0.0.0.0:9103"
        PAGESTREAM_UPLOADER_TARGET     = "s3"
        PAGESTREAM_UPLOADER_S3_BUCKET  = var.s3_bucket
      }

      resources {
        cpu    = 500
        memory = 256
      }
    }
  }

  # Webhooks: signs and POSTs document states (and page outcomes when a
  # submission asks) to each document's callback_url. Scales on the lag of
  # its events consumer; deliveries are retried for notifier.retry_for_secs.
  group "notifier" {
    count = 1

    network {
      port "admin" {
        to = 9104
      }
    }

    service {
      name     = "pagestream-notifier"
      port     = "admin"
      provider = "nomad"

      check {
        type     = "http"
        path     = "/readyz"
        interval = "10s"
        timeout  = "2s"
      }
    }

    restart {
      attempts = 3
      interval = "5m"
      delay    = "15s"
      mode     = "delay"
    }

    scaling {
      enabled = true
      min     = 1
      max     = 4

      policy {
        cooldown            = "2m"
        evaluation_interval = "30s"

        check "events_lag" {
          source = "prometheus"
          query  = "max(pagestream_queue_pending{stage=\"notifier\"})"

          strategy "target-value" {
            target = 256
          }
        }
      }
    }

    task "notifier" {
      driver = "docker"

      config {
        image = var.image
        args  = ["notifier"]
        ports = ["admin"]
      }

      template {
        destination = "secrets/pagestream.env"
        env         = true
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/pagestream" }}
          PAGESTREAM_NATS_URL={{ .nats_url }}
          PAGESTREAM_NOTIFIER_SECRET={{ .webhook_secret }}
          {{ end }}
        EOT
      }

      env {
        PAGESTREAM_NATS_REPLICAS       = "${var.replicas}"
        PAGESTREAM_NOTIFIER_ADMIN_ADDR = "0.0.0.0:9104"
      }

      resources {
        cpu    = 200
        memory = 128
      }
    }
  }
}
