// Decode throughput of N sequences split over K llama.cpp contexts ("lanes"), each driven by
// its own thread that chooses every sequence's next token from its logits (greedy), as a
// serving engine must, or feeds random tokens, as llama-batched-bench does. One question:
// does a lane's host work (graph inputs, launch, logits scans) hide behind the other lanes'
// device work, and do the lanes' kernels share the GPU?
//
// GREEDY: 0 random tokens, 1 greedy on the host (the logits are copied back and scanned),
// 2 greedy in llama.cpp's graph (a backend sampler chain per sequence: only token ids come
// back), 3 the same with the end-of-generation tokens banned first (logit bias), as
// `ignore_eos` needs.
//
//   isthmus-lanes-bench MODEL STREAMS LANES [PP=128] [TG=128] [GREEDY=1]
#include "ggml-backend.h"
#include "llama.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

using Clock = std::chrono::steady_clock;

struct Lane {
    llama_context * ctx = nullptr;
    int streams = 0;
    double host_decode_s = 0;  // inside llama_decode
    double wait_s = 0;         // first logits read: waiting for the device
    double scan_s = 0;         // greedy scans
};

static int argmax(const float * row, int n) {
    int best = 0;
    float top = row[0];
    for (int i = 1; i < n; ++i) {
        if (row[i] > top) {
            top = row[i];
            best = i;
        }
    }
    return best;
}

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL STREAMS LANES [PP] [TG] [GREEDY]\n", argv[0]);
        return 2;
    }
    const char * path = argv[1];
    const int streams = atoi(argv[2]);
    const int lanes = atoi(argv[3]);
    const int pp = argc > 4 ? atoi(argv[4]) : 128;
    const int tg = argc > 5 ? atoi(argv[5]) : 128;
    const int mode = argc > 6 ? atoi(argv[6]) : 1;
    const bool greedy = mode != 0;
    const bool on_device = mode >= 2;
    if (streams < 1 || lanes < 1 || streams % lanes != 0) {
        fprintf(stderr, "STREAMS must be a positive multiple of LANES\n");
        return 2;
    }
    llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);
    ggml_backend_load_all();
    llama_backend_init();
    auto mparams = llama_model_default_params();
    mparams.n_gpu_layers = 999;
    llama_model * model = llama_model_load_from_file(path, mparams);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", path);
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    const int per_lane = streams / lanes;
    std::vector<llama_logit_bias> banned;
    for (llama_token token = 0; token < n_vocab; ++token) {
        if (llama_vocab_is_eog(vocab, token)) {
            banned.push_back({token, -INFINITY});
        }
    }
    std::vector<Lane> lane(lanes);
    std::vector<std::vector<llama_sampler_seq_config>> configs(lanes);
    for (int index = 0; index < lanes; ++index) {
        Lane & l = lane[index];
        auto cparams = llama_context_default_params();
        cparams.n_ctx = ((per_lane * (pp + tg) + 255) / 256) * 256;
        cparams.n_batch = 2048;
        cparams.n_ubatch = 512;
        cparams.n_seq_max = per_lane;
        cparams.n_threads = 8;
        cparams.n_threads_batch = 8;
        cparams.kv_unified = false;
        if (on_device) {
            for (int s = 0; s < per_lane; ++s) {
                llama_sampler * chain = llama_sampler_chain_init(llama_sampler_chain_default_params());
                if (mode == 3) {
                    llama_sampler_chain_add(chain, llama_sampler_init_logit_bias(n_vocab, (int32_t) banned.size(), banned.data()));
                }
                llama_sampler_chain_add(chain, llama_sampler_init_greedy());
                configs[index].push_back({s, chain});
            }
            cparams.samplers = configs[index].data();
            cparams.n_samplers = configs[index].size();
        }
        l.ctx = llama_init_from_model(model, cparams);
        l.streams = per_lane;
        if (!l.ctx) {
            fprintf(stderr, "cannot make context\n");
            return 1;
        }
    }
    std::atomic<int> ready{0};
    std::atomic<bool> go{false};
    std::vector<double> finished(lanes);
    auto run = [&](int index) {
        Lane & l = lane[index];
        std::mt19937 rng(1234 + index);
        llama_batch batch = llama_batch_init(std::max(pp, l.streams), 0, 1);
        std::vector<llama_token> next(l.streams);
        // Prefill each sequence, as the anchor does, then one warm-up decode step.
        for (int s = 0; s < l.streams; ++s) {
            batch.n_tokens = 0;
            for (int i = 0; i < pp; ++i) {
                int k = batch.n_tokens++;
                batch.token[k] = rng() % n_vocab;
                batch.pos[k] = i;
                batch.n_seq_id[k] = 1;
                batch.seq_id[k][0] = s;
                batch.logits[k] = i == pp - 1;
            }
            llama_decode(l.ctx, batch);
            next[s] = on_device ? llama_get_sampled_token_ith(l.ctx, -1)
                                : argmax(llama_get_logits_ith(l.ctx, -1), n_vocab);
        }
        ready.fetch_add(1);
        while (!go.load()) {
        }
        for (int step = 0; step < tg; ++step) {
            batch.n_tokens = 0;
            for (int s = 0; s < l.streams; ++s) {
                int k = batch.n_tokens++;
                batch.token[k] = greedy ? next[s] : (llama_token) (rng() % n_vocab);
                batch.pos[k] = pp + step;
                batch.n_seq_id[k] = 1;
                batch.seq_id[k][0] = s;
                batch.logits[k] = true;
            }
            auto t0 = Clock::now();
            if (llama_decode(l.ctx, batch) != 0) {
                fprintf(stderr, "decode failed\n");
                std::exit(1);
            }
            auto t1 = Clock::now();
            if (on_device) {
                next[0] = llama_get_sampled_token_ith(l.ctx, 0);
                auto t2 = Clock::now();
                for (int s = 1; s < l.streams; ++s) {
                    next[s] = llama_get_sampled_token_ith(l.ctx, s);
                }
                auto t3 = Clock::now();
                l.host_decode_s += std::chrono::duration<double>(t1 - t0).count();
                l.wait_s += std::chrono::duration<double>(t2 - t1).count();
                l.scan_s += std::chrono::duration<double>(t3 - t2).count();
                continue;
            }
            const float * first = llama_get_logits_ith(l.ctx, 0);
            auto t2 = Clock::now();
            if (greedy) {
                next[0] = argmax(first, n_vocab);
                for (int s = 1; s < l.streams; ++s) {
                    next[s] = argmax(llama_get_logits_ith(l.ctx, s), n_vocab);
                }
            }
            auto t3 = Clock::now();
            l.host_decode_s += std::chrono::duration<double>(t1 - t0).count();
            l.wait_s += std::chrono::duration<double>(t2 - t1).count();
            l.scan_s += std::chrono::duration<double>(t3 - t2).count();
        }
        finished[index] = std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
        llama_batch_free(batch);
    };
    std::vector<std::thread> threads;
    for (int i = 0; i < lanes; ++i) {
        threads.emplace_back(run, i);
    }
    while (ready.load() < lanes) {
    }
    double start = std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
    go.store(true);
    for (auto & t : threads) {
        t.join();
    }
    double end = 0;
    for (double f : finished) {
        end = std::max(end, f);
    }
    double wall = end - start;
    double decode = 0, wait = 0, scan = 0;
    for (auto & l : lane) {
        decode += l.host_decode_s;
        wait += l.wait_s;
        scan += l.scan_s;
    }
    printf("streams=%d lanes=%d greedy=%d pp=%d tg=%d: %.0f tok/s; per lane step: llama_decode %.3f ms, "
           "wait %.3f ms, scans %.3f ms\n",
           streams, lanes, mode, pp, tg, streams * tg / wall, decode / lanes / tg * 1e3,
           wait / lanes / tg * 1e3, scan / lanes / tg * 1e3);
    for (auto & l : lane) {
        llama_free(l.ctx);
    }
    for (auto & lane_configs : configs) {
        for (auto & config : lane_configs) {
            llama_sampler_free(config.sampler);
        }
    }
    llama_model_free(model);
    return 0;
}
