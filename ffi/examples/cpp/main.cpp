// hyzo from C++17 through hyzo.hpp: ZO-AdamW on a quadratic, save/restore, and errors as
// exceptions. Built with CMake against an installed hyzo (find_package(hyzo)).
#include <cmath>
#include <cstdio>
#include <vector>

#include "hyzo.hpp"

int main() {
    const std::size_t n = 64;
    std::vector<float> w(n, 0.0f), target(n);
    for (std::size_t i = 0; i < n; i++) target[i] = std::sin(0.3f * static_cast<float>(i));
    auto loss = [&] {
        float s = 0.0f;
        for (std::size_t i = 0; i < n; i++) s += (w[i] - target[i]) * (w[i] - target[i]);
        return s / static_cast<float>(n);
    };

    hyzo_config cfg = hyzo::default_config();
    cfg.rule = HYZO_RULE_ADAMW;
    cfg.lr = 0.02f;
    cfg.eps = 1e-2f;
    cfg.num_directions = 4;
    cfg.seed = 99;

    int failures = 0;
    try {
        hyzo::Optimizer opt = hyzo::Optimizer::cpu(cfg, 2);
        opt.add_tensor(w.data(), n, 0);
        const float first = loss();
        for (int step = 0; step < 300; step++) {
            const float l = opt.zo_step(loss);
            if (step % 100 == 0) std::printf("  step %3d  loss %.5f\n", step, l);
        }
        const float last = loss();
        std::printf("zo-adamw: loss %.5f -> %.5f in %llu steps\n", first, last,
                    static_cast<unsigned long long>(opt.steps()));
        if (!(last < 0.5f * first)) {
            std::fprintf(stderr, "FAIL: the loss did not halve\n");
            failures++;
        }

        // Save, run, restore, run again: the same bits.
        auto state = opt.save_state();
        auto saved = w;
        for (int i = 0; i < 20; i++) opt.zo_step(loss);
        auto after = w;
        opt.load_state(state);
        w = saved;
        for (int i = 0; i < 20; i++) opt.zo_step(loss);
        if (w != after) {
            std::fprintf(stderr, "FAIL: the resumed run differs\n");
            failures++;
        }

        // A failing call throws hyzo::Error with the status and the message.
        try {
            opt.set_lr(-1.0f);
            std::fprintf(stderr, "FAIL: a negative lr was accepted\n");
            failures++;
        } catch (const hyzo::Error &e) {
            std::printf("caught: status %d, %s\n", static_cast<int>(e.status()), e.what());
            if (e.status() != HYZO_ERR_INVALID_ARGUMENT) failures++;
        }

        // An exception in the forward pass aborts the step: parameters restored.
        auto before = w;
        try {
            opt.zo_step([]() -> float { throw std::runtime_error("forward failed"); });
        } catch (const std::runtime_error &e) {
            // Restored up to f32 rounding of perturb + restore (exact with the compensated
            // precision for f16/bf16).
            float worst = 0.0f;
            for (std::size_t i = 0; i < n; i++) worst = std::fmax(worst, std::fabs(w[i] - before[i]));
            std::printf("caught: %s; parameters restored (max change %g)\n", e.what(), worst);
            if (!(worst < 1e-5f)) failures++;
        }
    } catch (const hyzo::Error &e) {
        std::fprintf(stderr, "unexpected hyzo error: %s\n", e.what());
        return 1;
    }
    std::puts(failures == 0 ? "cpp example: OK" : "cpp example: FAILED");
    return failures == 0 ? 0 : 1;
}
