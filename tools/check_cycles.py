"""Fail if any two modules of the package, or any two of its subpackages, import each other through any chain.

grimp reads every import statement of every module, at module level and inside functions alike, so a cycle
hidden by a function-level import counts. Imports under `if TYPE_CHECKING:` are left out: they never run (a
module may name a type of a module that imports it, for annotations only). Subpackages are checked squashed (every
module of `cache` as one node), which catches `cache` -> `codecs` -> `cache` through different modules.
Run: `python tools/check_cycles.py` (CI: `make style`).
"""

from __future__ import annotations

import sys

import grimp


def cycles(package: str = "attentionpack", squash: bool = False) -> list[list[str]]:
    graph = grimp.build_graph(package, include_external_packages=False, exclude_type_checking_imports=True)
    if squash:
        for sub in sorted(graph.find_children(package)):
            if graph.find_children(sub):
                graph.squash_module(sub)
    found = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            if (
                imported == importer or squash and package in (importer, imported)
            ):  # self-loops of squashed packages; the root contains them all
                continue
            chain = graph.find_shortest_chain(importer=imported, imported=importer, as_packages=False)
            if chain:
                found.append([importer, *chain])
    return found


def main() -> int:
    found = cycles() + cycles(squash=True)
    graph = grimp.build_graph("attentionpack", include_external_packages=False, exclude_type_checking_imports=True)
    edges = sum(len(graph.find_modules_directly_imported_by(m)) for m in graph.modules)
    for chain in found:
        print("import cycle: " + " -> ".join(chain))
    print(
        f"{len(graph.modules)} modules, {edges} imports (module and function level, TYPE_CHECKING left out), "
        f"{len(found)} cycles between modules or subpackages"
    )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
