"""``tests.real_server.app`` served by the official Python SDK's own Connect client, the
baseline the scenarios compare connect_worker with. The model is called with the plain
OpenAI client (no result cache: what an SDK user without our toolkit has).

``RS_INSTANCE_ID`` is its instance id; ``RS_GATEWAY_URL`` (the test proxy) replaces the
gateway URL the API hands out. It stops on SIGTERM the SDK's way (WORKER_PAUSE, wait
for in-flight steps, close).
"""

from __future__ import annotations

import asyncio
import logging
import os

from inngest.connect import connect
from openai import AsyncOpenAI

from . import app


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    openai = AsyncOpenAI()  # OPENAI_BASE_URL and OPENAI_API_KEY from the environment

    async def complete(prompt: str) -> str:
        answer = await openai.chat.completions.create(
            model="gpt-4.1-mini", max_tokens=200,
            messages=[{"role": "user", "content": prompt}])
        return answer.choices[0].message.content or ""

    app.use_model(complete)
    gateway = os.environ.get("RS_GATEWAY_URL")
    conn = connect([(app.client, list(app.functions))],
                   instance_id=os.environ.get("RS_INSTANCE_ID"),
                   rewrite_gateway_endpoint=(lambda _url: gateway) if gateway else None)
    asyncio.run(conn.start())


if __name__ == "__main__":
    main()
